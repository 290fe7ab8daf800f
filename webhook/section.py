"""The base of every configuration section: its own module, so that the sections (``config``, ``injection``,
``policy``) import it without importing each other."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Sections reject unknown keys so that a typo in the config file is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
