"""Error types tx raises for bad input. Each message names the problem and what would fix it."""


class TxError(Exception):
    """Base class of tx's own errors: bad input that a user can fix."""


class CheckpointError(TxError, ValueError):
    """A checkpoint folder, config or safetensors file that tx cannot use as it is."""


class ConfigError(TxError, ValueError):
    """An invalid option value (LoRA, connector, training or CLI configuration)."""


class AdapterError(TxError, ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


class DataError(TxError, ValueError):
    """Training or evaluation data that cannot be read or tokenized."""


class WriteError(TxError, OSError):
    """A file tx could not write (the disk is full, the folder is read-only, ...); what was there before is kept."""
