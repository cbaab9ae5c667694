"""What unilora reads from and writes to disk: validated reading, atomic writing, adapter folders."""
