"""Tasks, records and prompts: Reason-RFT's three task families and the offline synthetic counting task."""

from ekipl.data.prompts import (
    Prompt,
    build_messages,
    check_prompt_lengths,
    decode_completion,
    encode_prompt,
    prompt_lengths,
    prompt_text,
)
from ekipl.data.records import BadRecordError, BadRow, LoadedDataset, Record, load_records
from ekipl.data.tasks import SYNTHETIC_TASK, TASK_FAMILIES, task_family

__all__ = [
    "Prompt",
    "BadRecordError",
    "BadRow",
    "LoadedDataset",
    "Record",
    "SYNTHETIC_TASK",
    "TASK_FAMILIES",
    "build_messages",
    "check_prompt_lengths",
    "decode_completion",
    "encode_prompt",
    "load_records",
    "prompt_lengths",
    "prompt_text",
    "task_family",
]
