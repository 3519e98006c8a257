"""Decisions: connect, HELO, sender, recipient/relay, access lists, greylisting, filters."""
