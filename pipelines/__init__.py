"""`cgmllm.pipelines`: the diffusers pipeline of CG-MLLM (text/image -> mesh, captioning)."""

from .pipeline_cgmllm import CGMLLMPipeline, CGMLLMPipelineOutput, official_flow_sigmas


__all__ = ["CGMLLMPipeline", "CGMLLMPipelineOutput", "official_flow_sigmas"]
