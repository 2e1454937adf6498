"""Compatibility shims for the environments dist_fair runs in."""
