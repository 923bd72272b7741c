"""Analysis and visualisation tools."""
