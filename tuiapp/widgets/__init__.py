"""Small widgets of the Cherry app."""
