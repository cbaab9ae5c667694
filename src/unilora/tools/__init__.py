"""Working with saved adapters without training: inspect, export and convert to PEFT, compress by
fitting a low-rank update, count parameters."""
