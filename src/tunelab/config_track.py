"""Config section `track`: MLflow tracking and what `tunelab run` registers.

Part of the one RunConfig (tunelab.config).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from tunelab.config_section import Section


class TrackConfig(Section):
    enabled: bool = Field(True, description="Log data prep, training, eval and export to MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server (http://...) or store URI; default: an embedded sqlite store "
        "(mlflow.db) and artifact folder (mlartifacts/) beside the run folder."
    )
    experiment: str = Field("tunelab", description="MLflow experiment name.")
    register_as: str | None = Field(
        None, description="`tunelab run` registers the evaluated adapter as a new version of this registered model "
        "(with its eval and gate result, also when the gate failed; promotion stays a separate, gated step).",
    )

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        # What models:/NAME@ALIAS can name again, and what a Kubernetes resource name can be made of.
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(f"track.register_as: {value!r} is not a model name tunelab can refer to again "
                             "(letters, digits, '.', '_' and '-', at most 100, e.g. order-extractor)")
        return value
