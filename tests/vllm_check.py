"""Run inside the vLLM environment (scripts/vllm_venv.sh) by tests/deploy/test_deploy.py: vLLM's plugin
loader finds and registers the unilora resolver through its entry point; the resolved folder
passes vLLM's PEFTHelper and validate_legal; names it must refuse give None. Prints one JSON line.

    python tests/vllm_check.py STORE BASE_NAME MAX_POSITION_EMBEDDINGS good-name refused-name ...
"""

import asyncio
import json
import sys

from vllm.config.lora import LoRAConfig
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.resolver import LoRAResolverRegistry
from vllm.plugins import load_general_plugins


def main() -> None:
    base, max_positions, good, refused = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    load_general_plugins()  # reads UNILORA_VLLM_STORE, set by the caller
    resolver = LoRAResolverRegistry.get_resolver("unilora")
    request = asyncio.run(resolver.resolve_lora(base, good))
    helper = PEFTHelper.from_local_dir(request.lora_path, max_position_embeddings=max_positions)
    helper.validate_legal(LoRAConfig(max_lora_rank=8))
    too_small = None
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=1))
    except ValueError as err:
        too_small = str(err)
    answers = {name: asyncio.run(resolver.resolve_lora(base, name)) for name in refused}
    print(json.dumps({"registered": sorted(LoRAResolverRegistry.get_supported_resolvers()),
                      "name": request.lora_name, "id": request.lora_int_id, "path": request.lora_path,
                      "r": helper.r, "target_modules": sorted(helper.target_modules),
                      "rank_1_refused": too_small, "refused": {n: a is None for n, a in answers.items()}}))


if __name__ == "__main__":
    main()
