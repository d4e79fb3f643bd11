"""Attention head sharing: multi-head to grouped-query or multi-query attention."""
