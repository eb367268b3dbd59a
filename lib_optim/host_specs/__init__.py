"""What we know about each WebUI host without importing it: its kind, names and how to detect a checkout."""
