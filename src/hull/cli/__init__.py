"""Command-line front end: argument parsing only; every verb calls into hull.runtime."""
