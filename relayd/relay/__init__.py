"""Delivery to destinations (relay engine)."""
