"""Files: streaming safetensors (:mod:`.safetensors`), the quantized file format
(:mod:`.fileformat`), checkpoint folders (:mod:`.folders`), atomic outputs (:mod:`.atomic`),
and whole-checkpoint conversion (:mod:`.checkpoint`: a ``convert_shard`` that drivers map over
shards)."""
