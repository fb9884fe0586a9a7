from popdsl.frontend.parser import parse

__all__ = ["parse"]
