"""Annotators: which character spans of a response are critical (key steps of a correct response,
the first error of an incorrect one), plus a coarse type label. Alignment to tokens is
``trace_rl.algo.spans``; the driver does it with the response's token offsets."""
from trace_rl.annotate.base import ANNOTATORS, Annotation, get_annotator, response_token_offsets

__all__ = ["ANNOTATORS", "Annotation", "get_annotator", "response_token_offsets"]
