"""The registry's tables as typed SQLAlchemy models."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AdapterStatus(enum.StrEnum):
    """Lifecycle of one adapter version: PENDING → READY → DELETED.

    The upload flow inserts rows READY in the same transaction that makes them
    visible; PENDING is reserved for rows written before their blob is known
    to be complete (no current code path leaves one behind).
    """

    PENDING = "PENDING"
    READY = "READY"
    DELETED = "DELETED"


class AdapterName(Base):
    """One row per adapter name; uploads lock it to number versions without gaps."""

    __tablename__ = "adapter_names"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Adapter(Base):
    """One immutable version of a named adapter, pointing at its blob by digest."""

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        Index("ix_adapters_digest", "digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), ForeignKey("adapter_names.name"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[AdapterStatus] = mapped_column(
        Enum(
            AdapterStatus,
            native_enum=False,
            create_constraint=True,
            length=16,
            name="adapter_status",
        ),
        default=AdapterStatus.READY,
    )
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    base_architecture: Mapped[str] = mapped_column(String(64))
    # The base quantization the adapter was trained on (nf4, fp4, int8, ...) when its
    # adapter_config.json records one; NULL: not recorded (migration 0002).
    base_quantization: Mapped[str | None] = mapped_column(String(16), nullable=True)
    adapter_type: Mapped[str] = mapped_column(String(16))
    rank: Mapped[int] = mapped_column(Integer)
    max_module_rank: Mapped[int] = mapped_column(Integer)
    rank_pattern: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    alpha: Mapped[float] = mapped_column(Float)
    alpha_pattern: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    use_rslora: Mapped[bool] = mapped_column(default=False)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the CLI and the admin API."""
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status.value,
            "digest": self.digest,
            "adapter_type": self.adapter_type,
            "rank": self.rank,
            "max_module_rank": self.max_module_rank,
            "rank_pattern": self.rank_pattern,
            "alpha": self.alpha,
            "alpha_pattern": self.alpha_pattern,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "base_fingerprint": self.base_fingerprint,
            "base_architecture": self.base_architecture,
            "base_quantization": self.base_quantization,
            "description": self.description,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "deleted_at": self.deleted_at.isoformat() if self.deleted_at else None,
        }
