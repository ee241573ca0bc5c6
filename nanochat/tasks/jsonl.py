"""
User data from JSONL files (the MiniMind formats of nanochat/records.py), read from disk by offset.

JSONLConversations(path): one conversation per line, {"conversations": [...]} or {"messages": [...]};
think markup in our form (MiniMind's <answer> tags dropped, see records.think_markup).
PreferencePairs(path): DPO rows, {"prompt", "chosen", "rejected"} strings or MiniMind's
{"chosen": [messages], "rejected": [messages]}; get(i) -> {"prompt", "chosen", "rejected"} where
chosen / rejected are whole conversations.

Opening a file indexes the byte offset of each non-blank line (8 bytes a row; a 1.2M-row file
costs 10 MB, not its size several times over) and get(i) reads and parses that line. A file
the cleaning pass wrote (its report says so) is trusted as it is; any other file is validated
line by line while it is indexed, so a bad line still stops the run before training starts.
A bad line raises DataError naming the file, the line and the field, e.g.
`data.jsonl: line 3: field 'conversations[1].role': ...`.
"""
import os
from array import array

from nanochat.clean_data import cleaning_summary
from nanochat.common import DataError, open_input, parse_jsonl_line
from nanochat.records import check_conversation, check_preference_pair
from nanochat.tasks.common import Task

_ROW = "<row>"  # stands for 'file: line N' until an error needs the line number


class JSONLRows(Task):
    """The rows of a JSONL file, each parsed by `parse(obj, where)` when it is read."""

    def __init__(self, path: str, validate: bool | None = None, **slice_args):
        super().__init__(**slice_args)
        self.path = path
        self.cleaning = cleaning_summary(path)  # None unless nanochat.clean_data wrote this very file
        self.offsets = self._index(validate if validate is not None else self.cleaning is None)
        self._fd = None

    def parse(self, obj: dict, where: str) -> dict:
        raise NotImplementedError

    def _index(self, validate):
        """Offsets of the non-blank lines plus the file's size (so row i spans offsets[i]:offsets[i+1])."""
        offsets, position = array("q"), 0
        with open_input(self.path) as f:
            for lineno, raw in enumerate(f, start=1):
                if validate:
                    obj = parse_jsonl_line(raw, f"{self.path}: line {lineno}")
                    if obj is not None:
                        self.parse(obj, f"{self.path}: line {lineno}")
                        offsets.append(position)
                elif raw.strip():
                    offsets.append(position)
                position += len(raw)
            self._stat = os.fstat(f.fileno())
        if not offsets:
            raise DataError(f"{self.path}: empty file (no JSON lines)")
        offsets.append(position)
        return offsets

    def num_examples(self):
        return len(self.offsets) - 1

    def _read(self, index):
        if self._fd is None or self._fd[0] != os.getpid():  # one descriptor per process (after a fork too)
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        st = os.fstat(self._fd[1])
        if (st.st_size, st.st_mtime_ns) != (self._stat.st_size, self._stat.st_mtime_ns):
            raise DataError(f"{self.path}: changed since it was opened; restart the run")
        start, end = self.offsets[index], self.offsets[index + 1]
        return os.pread(self._fd[1], end - start, start)

    def get_example(self, index):
        try:
            obj = parse_jsonl_line(self._read(index), _ROW)
            if obj is None:
                raise DataError(f"{_ROW}: blank where a row was indexed", "empty_content")
            return self.parse(obj, _ROW)
        except DataError as e:  # counting the lines before this row is a pass over the file: only now
            where = f"{self.path}: line {self._line_number(self.offsets[index])}"
            raise DataError(str(e).replace(_ROW, where, 1), e.reason) from None

    def _line_number(self, offset):
        lines, done = 1, 0
        with open(self.path, "rb") as f:
            while done < offset:
                block = f.read(min(1 << 24, offset - done))
                lines, done = lines + block.count(b"\n"), done + len(block)
        return lines

    def __del__(self):
        if getattr(self, "_fd", None) and self._fd[0] == os.getpid():
            os.close(self._fd[1])


class JSONLConversations(JSONLRows):
    """Conversations from a user's JSONL file."""

    def parse(self, obj, where):
        return check_conversation(obj, where)


class PreferencePairs(JSONLRows):
    """DPO pairs from a user's JSONL file (both formats)."""

    def parse(self, obj, where):
        return check_preference_pair(obj, where)
