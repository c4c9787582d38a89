"""Plugins bundled with sweeperd; loaded by the same mechanism as drop-in plugins."""
