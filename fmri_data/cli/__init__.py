"""The ``fmri-data`` command line (entry point :func:`fmri_data.cli.main.main`)."""
