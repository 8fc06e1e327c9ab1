"""Reports people look at: one self-contained HTML file with charts (``nurture report html``)."""
