"""pyvene's hook-type constants, for registering foreign models in `type_to_module_mapping`."""

CONST_INPUT_HOOK = "register_forward_pre_hook"
CONST_OUTPUT_HOOK = "register_forward_hook"
