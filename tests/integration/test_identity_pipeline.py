"""Identity through the whole pipeline: the real detector, the real offline recognizer (dlib)
and the keyed mapper give every face of the same real person the same synthetic identity.

Same-person cases come from one packaged photo (t1.jpg, six people) and a changed copy of it
(rescaled to 80 %, brightened, rotated by 3 degrees): no package ships several photos per
person."""

from __future__ import annotations

import torch

from anonloader import Anonymizer
from anonloader.identity.assigner import KeyedIdentityAssigner
from anonloader.identity.bank import IdentityBank

from _identity_faces import changed_photo


def _left_to_right(records):
    return [r.synthetic_id for r in sorted(records, key=lambda r: r.box[0])]


def test_same_people_get_the_same_synthetic_identities(t1_image):
    generator = torch.Generator().manual_seed(7)
    bank = IdentityBank(torch.nn.functional.normalize(torch.randn(64, 128, generator=generator), dim=1))
    assigner = KeyedIdentityAssigner("online", secret="correct horse battery staple", bank=bank)
    anonymizer = Anonymizer("blur", identity=assigner)
    assert assigner.crop_size is not None  # the pipeline aligns faces for the recognizer
    first = anonymizer([t1_image]).records[0]
    second = anonymizer([changed_photo(t1_image)]).records[0]
    ids_first, ids_second = _left_to_right(first), _left_to_right(second)
    assert len(ids_first) == 6 and None not in ids_first
    assert len(set(ids_first)) == 6  # six people, six synthetic identities
    assert ids_first == ids_second  # the same six people again

    other = Anonymizer("blur", identity=KeyedIdentityAssigner("online", secret="another secret", bank=bank))
    assert _left_to_right(other([t1_image]).records[0]) != ids_first
    assert "correct horse" not in str(anonymizer.config())
    assert anonymizer.fingerprint() != other.fingerprint()
