"""Tokens -> text -> metrics: the one evaluation path (loop), the coco-caption toolkit's arithmetic
(metrics), the error page (analysis), attention drawings (attention) and the gallery (gallery)."""
