"""safetensors streaming: lazy readers over files, shards and folders; atomic streaming writers."""
