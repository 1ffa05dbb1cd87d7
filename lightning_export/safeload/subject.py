"""What the safe loader is reading, as its messages name it: a checkpoint (`CHECKPOINT`), or a torch.save file a
flag gave (`--data PATH`, `--example-inputs PATH`: `Subject.flagged`). Every message of `load_verified` about the
file renders from it, so no caller rewrites the loader's words."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subject:
    noun: str  # "the checkpoint was not written completely", "a checkpoint only refers to it"
    file_noun: str  # "PATH is a directory, not a checkpoint file"
    torch_noun: str  # "PATH is not a torch checkpoint, or it is corrupt"
    flag: str | None = None  # None: a message names the path alone; "--data": it names `--data PATH`
    folders: bool = False  # a folder can be one (DCP, DeepSpeed): a directory's message says what it lacks

    @classmethod
    def flagged(cls, flag: str) -> Subject:
        """A torch.save file of tensors given with `flag`, read under the checkpoint loader's rules."""
        return cls("file", "torch.save file", "torch.save file", flag=flag)

    def name(self, path: Path) -> str:
        """How a message that begins with the file names it: `PATH`, or `--data PATH`."""
        return str(path) if self.flag is None else f"{self.flag} {path}"

    def called(self, path: Path) -> str:
        """The file named with what it is: `checkpoint PATH`, or `--data PATH`."""
        return f"{self.noun} {path}" if self.flag is None else self.name(path)

    def not_found(self, path: Path) -> str:
        return f"{self.noun} not found: {path}" if self.flag is None else f"{self.name(path)}: {self.noun} not found"

    def about(self, path: Path, text: str) -> str:
        """A message whose subject is a part of the file (a record, a tensor) or this torch: said as it is of a
        checkpoint, after `--data PATH: ` for a flag's file (whose messages all begin with the flag)."""
        return text if self.flag is None else f"{self.name(path)}: {text}"


CHECKPOINT = Subject("checkpoint", "checkpoint file", "torch checkpoint", folders=True)
