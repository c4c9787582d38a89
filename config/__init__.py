"""Example configurations, installed with the package so that `sweeperd demo` works anywhere."""
