"""The HTTP service (``diffsearch serve``): searches from creative tools, with live progress.

:func:`diffsearch.service.app.create_app` builds the FastAPI app from a
:class:`~diffsearch.service.config.ServiceConfig`; the page it serves lives in ``static/``.
"""
