"""Command-line tools shipped with ekipl (``python -m ekipl.tools.<name>``)."""
