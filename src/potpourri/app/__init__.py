"""The interactive inspection assistant: ``potpourri chat`` (terminal) and ``potpourri serve`` (Gradio web app).

Both wrap ``Assistant``: a trained ``potpourri vlm train`` run answers questions about an image, the boxes and masks
written as text in its answers are drawn, and an optional inspection run adds its verdict.
Contract: may import every folder except cli/ and papers/.
"""

from potpourri.app.assistant import Assistant, Reply, answer_regions, draw_answer, load_vlm_run

__all__ = ["Assistant", "Reply", "answer_regions", "draw_answer", "load_vlm_run"]
