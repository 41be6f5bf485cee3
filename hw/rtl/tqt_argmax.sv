// Argmax over a stream of logits: the first maximum (the lowest index among equal values), as
// greedy decoding takes the next token. One logit per cycle while in_valid; `first` marks a row's
// first logit; `index` holds the row's answer from the cycle after its last logit.
module tqt_argmax #(
    parameter int W = 32,
    parameter int INDEX_W = 16
) (
    input  logic                  clk,
    input  logic                  in_valid,
    input  logic                  first,
    input  logic signed [W-1:0]   value,
    output logic [INDEX_W-1:0]    index
);
  logic signed [W-1:0] best;
  logic [INDEX_W-1:0] position;
  always_ff @(posedge clk) begin
    if (in_valid) begin
      position <= first ? INDEX_W'(1) : position + INDEX_W'(1);
      if (first || value > best) begin  // strictly greater: a tie keeps the earlier index
        best <= value;
        index <= first ? '0 : position;
      end
    end
  end
endmodule
