"""lmmscope: the saes stage."""
