"""cvtk-job: MMDetection training and inference as batch jobs."""

__version__ = "0.1.0"
