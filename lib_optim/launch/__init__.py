"""The launch check: flag tables, the command-line reader, the checker, env notes, profiles and doctor."""
