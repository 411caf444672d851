"""Imported first by the fork server of ``executor = "processes"`` (``quant.stages.executor``):
its workers, forked from that server, leave Ctrl-C to the driver and keep the libraries'
warnings and progress bars out of the driver's terminal. Importing this module does that to the
importing process; nothing else imports it."""

import signal

from quant.support.quiet import quiet_libraries

signal.signal(signal.SIGINT, signal.SIG_IGN)
quiet_libraries(progress_bars=False)
