"""Pictures: heatmaps and curves drawn with plotly and matplotlib, and reports."""
