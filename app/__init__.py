"""lmmscope: the app stage."""
