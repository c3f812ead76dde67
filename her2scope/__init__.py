"""her2scope: real-time, explainable HER2 IHC scoring for the camera on a pathologist's microscope.

The packages (see ``docs/architecture.md``): ``her2scope.scoring`` (pure image analysis: arrays in, frozen results
out), ``her2scope.daemon`` (the camera service), ``her2scope.clients`` (the programs people run) and
``her2scope.config`` (the pydantic models of the configuration).
"""
