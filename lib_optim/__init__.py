"""sd-webui-optim core library.

Plain Python + torch. Host code (``modules``, ``backend``, ``ldm``, ...) is imported only in
``lib_optim.hosts``; gradio only in ``lib_optim.ui``. Importing this package is cheap (no torch).
"""

__version__ = "0.1.0"
