"""`cgmllm.pipelines`: the diffusers pipeline of CG-MLLM (text/image -> mesh, captioning)."""

from .pipeline_cgmllm import CGMLLMPipeline, CGMLLMPipelineOutput


__all__ = ["CGMLLMPipeline", "CGMLLMPipelineOutput"]
