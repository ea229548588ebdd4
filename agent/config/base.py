"""What every config section shares: the immutable, strict base model and the name and
topic types that several sections use."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictStr

from agent import topics

NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _check_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 . _ -")
    return value


Name = Annotated[StrictStr, AfterValidator(_check_name)]
TopicName = Annotated[StrictStr, AfterValidator(topics.check_name)]


class Section(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
