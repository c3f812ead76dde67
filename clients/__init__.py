"""The programs people run: the command line, and (later) the recorder and the viewer."""
