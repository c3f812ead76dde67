"""What the test modules share, by what it is about; a test module imports it from here, never from another test
module or from ``conftest.py`` (which holds the pytest fixtures only).

- ``processes``: the repository root and ``die_with_parent``, the ``preexec_fn`` of every process a test starts.
- ``synthetic``: cached synthetic fields and control calibrations, ``match_cells`` (detections to truth), and the
  pixel size and membrane method many scoring tests use.
- ``daemon``: a real daemon process on the simulated microscope (``Daemon``, ``running_daemon``, ``CONFIG``), and
  waiting for it (``wait_for``, ``arrive``, ``next_message``).
- ``recorder``: the recorder as a process or in process beside such a daemon (``Setup``), capturing FOVs, and reading
  the case folder it writes (``read_docs``, ``wait_for_docs``).
- ``images``: ``read_image``, ``cv2.imread`` that fails the test when a file cannot be read.
- ``viewer``: the frames the daemon publishes, made in the test process (``Daemonish``), and a connected viewer state.
- ``web``: ``her2scope web`` as a process beside such a daemon (``running_web``) and headless Chromium driven by
  Selenium through the system's chromedriver (``headless_chromium``, ``needs_chromium``).
"""
