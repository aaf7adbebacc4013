"""Old import path of the concept file format; it lives in perfusion_ext.core.concept."""
from .core.concept import *  # noqa: F403
