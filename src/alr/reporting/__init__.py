"""Tables and figures generated from run folders (never typed by hand)."""
