"""The programs people run beside the daemon: the command line (``cli``), the recorder, the viewer, ``ctl``, the demo,
and offline scoring and re-scoring of image files and recorded cases."""
