"""Panel/Bokeh web viewer."""
