// A row of LANES multiply-accumulate lanes: LANES outputs of a matmul at once, each
// acc_l = sum_i x_i w_il + bias_l, exact in ACC_W bits (the export's proven accumulator width), then
// requantized onto the next site: q_l = clip(shift_round(acc_l, shift_l, R)) (a shift per lane: per-
// channel grids). One x (broadcast to every lane) and LANES weights per cycle while in_valid; `first`
// marks the first pair of a row (bias is read with it), `last` its final one (shift is read with it);
// acc and q are valid (out_valid) the cycle after `last`, until the next `last`. Lane l's words sit at
// bits [l*WIDTH +: WIDTH] of the packed ports.
module tqt_mac_row #(
    parameter int LANES = 16,
    parameter int X_W = 8,         // x: the input site's bits (+1 for an unsigned site)
    parameter int W_W = 8,         // w: the weight site's bits (signed)
    parameter int ACC_W = 32,
    parameter int OUT_W = 8,       // the requantized output
    parameter bit OUT_SIGNED = 1,
    parameter int ROUNDING = 2,
    parameter int SHIFT_W = 8,
    parameter int MAX_LEFT = 0
) (
    input  logic                        clk,
    input  logic                        in_valid,
    input  logic                        first,
    input  logic                        last,
    input  logic signed [X_W-1:0]       x,
    input  logic [LANES*W_W-1:0]        w,
    input  logic [LANES*ACC_W-1:0]      bias,
    input  logic [LANES*SHIFT_W-1:0]    shift,
    output logic                        out_valid,
    output logic [LANES*ACC_W-1:0]      acc,
    output logic [LANES*OUT_W-1:0]      q
);
  logic [LANES*SHIFT_W-1:0] out_shift;  // the finished row's shifts
  always_ff @(posedge clk) begin
    out_valid <= in_valid && last;
    if (in_valid && last) out_shift <= shift;
  end

  for (genvar l = 0; l < LANES; l++) begin : lane
    logic signed [W_W-1:0] weight;
    logic signed [ACC_W-1:0] lane_bias, product, next_sum, sum, result;
    assign weight = w[l*W_W +: W_W];
    assign lane_bias = bias[l*ACC_W +: ACC_W];
    assign product = x * weight;  // both sign-extended to ACC_W first: the product is exact
    assign next_sum = (first ? lane_bias : sum) + product;
    always_ff @(posedge clk) begin
      if (in_valid) sum <= next_sum;
      if (in_valid && last) result <= next_sum;  // held for the requantizer until the next row ends
    end
    assign acc[l*ACC_W +: ACC_W] = result;
    tqt_shift_round #(.IN_W(ACC_W), .OUT_W(OUT_W), .OUT_SIGNED(OUT_SIGNED), .ROUNDING(ROUNDING),
                      .SHIFT_W(SHIFT_W), .MAX_LEFT(MAX_LEFT))
        requantize (.q(result), .shift(out_shift[l*SHIFT_W +: SHIFT_W]), .out(q[l*OUT_W +: OUT_W]));
  end
endmodule
