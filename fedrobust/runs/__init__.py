"""What everything above training reads of a run: its members, the images it is scored on, content keys.

Evaluation, the loss and architecture searches and a study's trials all
build on this layer; it imports nothing of theirs (``tests/test_layering.py``).

:mod:`.members`
    ``member_files``, ``members_digest``, ``load_member``, ``load_ensemble``,
    ``check_complete`` (a run whose training finished).
:mod:`.images`
    ``Images`` (split, indices, how drawn), ``held_out_images``,
    ``evaluation_images``, ``evaluation_sample``, ``validation_indices``.
:mod:`.cache`
    content keys (``content_key``, ``tensor_fingerprint``) and the
    content-addressed cache of heavy artefacts.
"""

from .cache import cache_root, content_key, load_tensors, save_tensors, tensor_fingerprint
from .images import Images, evaluation_images, evaluation_sample, held_out_images, validation_indices
from .members import (INCOMPLETE, CheckpointError, check_complete, load_ensemble, load_member, member_files,
                      members_digest)

__all__ = ["INCOMPLETE", "CheckpointError", "Images", "cache_root", "check_complete", "content_key",
           "evaluation_images", "evaluation_sample", "held_out_images", "load_ensemble", "load_member",
           "load_tensors", "member_files", "members_digest", "save_tensors", "tensor_fingerprint",
           "validation_indices"]
