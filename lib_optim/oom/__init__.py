"""The out-of-memory retry: the next, more frugal setting to try after an OOM."""
