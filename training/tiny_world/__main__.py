"""`python -m cgmllm.training.tiny_world --out DIR`: build the tiny world data set (see `dataset.main`)."""

from .dataset import main


main()
