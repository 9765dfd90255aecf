"""Prompt-dataset plugins and the data files of each world (``data/<world>/<task>.yaml``)."""
