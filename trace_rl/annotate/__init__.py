"""Annotators: which character spans of a response are critical (key steps of a correct response,
the first error of an incorrect one), plus a coarse type label. Alignment to tokens is
``trace_rl.algo.spans``; the driver does it with the response's token offsets.

Kinds: ``oracle`` (the task's step checker), ``random`` and ``none`` (ablations) in ``base``; the LLM
annotators ``api``, ``model`` and ``self`` in ``llm`` (segments in ``segments``, reply parsing in
``parser``); :class:`AnnotatorService` runs ``api`` / ``model`` in Ray actors."""
from trace_rl.annotate.base import ANNOTATORS, Annotation, get_annotator, register_annotator, response_token_offsets
from trace_rl.annotate.llm import (ApiBackend, GenerateBackend, HFModelBackend, LLMAnnotator, Secret, build_messages,
                                   pool_text_generate)
from trace_rl.annotate.parser import ParsedReply, parse_reply, sanitize_label
from trace_rl.annotate.segments import Segment, render_segments, segment_spans, split_segments
from trace_rl.annotate.service import AnnotatorService, make_annotator

__all__ = ["ANNOTATORS", "Annotation", "get_annotator", "register_annotator", "response_token_offsets",
           "ApiBackend", "GenerateBackend", "HFModelBackend", "LLMAnnotator", "Secret", "build_messages",
           "pool_text_generate", "ParsedReply", "parse_reply", "sanitize_label", "Segment", "render_segments",
           "segment_spans", "split_segments", "AnnotatorService", "make_annotator"]
